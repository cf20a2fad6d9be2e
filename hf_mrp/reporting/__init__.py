"""Drawing and writing results people read: plots (PNG) and Markdown; the files themselves are written by
storage, model cards by research.reports."""
