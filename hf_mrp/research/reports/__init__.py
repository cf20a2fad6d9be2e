"""Reports of the harness only: the sweep's plots, the paper's reference numbers, the model card of a refine run."""
