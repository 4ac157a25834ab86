"""Token-labeler side of STL: the FAN model family (`labeler.models`), the batched torch view renderer
(`labeler.render_torch`) and teacher inference (`labeler.teacher`). Never imports ray."""
