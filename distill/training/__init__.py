"""`distill train`: `config` (its settings), `run` (the command: run folder, resume, summary), `trainer` (the
loop), `step` (one batch's loss and backward, GradCache), `batches` (epoch plans), `examples` (training
examples from labels, candidates or qrels), `checkpoint`, `memory`, `remine`, `distributed`, `report`,
`run_folder`, `setup`."""
