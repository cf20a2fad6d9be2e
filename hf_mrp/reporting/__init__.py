"""Writing results: atomic files, plots, Markdown and model cards."""
