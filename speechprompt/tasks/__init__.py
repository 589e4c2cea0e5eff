"""Task definitions and their metrics (:mod:`speechprompt.tasks.metrics`)."""
