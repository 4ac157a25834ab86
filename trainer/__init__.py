"""Student training on stored token labels (stage 2), stage-1 labeler training, evaluation.

Kept import-free on purpose: `trainer.config` must load without torch so CLIs validate configs fast.
Import the modules you need: `trainer.loader` (build_student_loader, build_labeler_loader,
build_eval_loader), `trainer.target_builder` (TargetBuilder), `trainer.data_config`, ...
`trainer` never imports ray, and from `labeler` only `labeler.models` and `labeler.device` (docs/internals.md).
"""
