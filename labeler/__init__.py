"""Token-labeler side of STL: the FAN model family (`labeler.models`), the batched torch view renderer
(`labeler.render_batch`) and teacher inference (`labeler.teacher`). Never imports ray."""
