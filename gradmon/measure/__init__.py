"""The measuring side: what runs inside the train step.

The door (`observer`: the hook on `optimizer.apply`), its options (`settings`:
one `GradientSettings`), the gradient pipeline
(`pipeline`, `transforms`, `penalties`), the statistics (`moments`: pure tensor
reductions; `statistics`: the plug-ins that choose and name them), the record ring
(`recorder`), the spike detector (`spikes`) and gradmon's own train step
(`train_step`). Nothing here writes files.
"""
