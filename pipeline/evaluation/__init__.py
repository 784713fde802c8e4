"""Sample quality of learned and baseline schedules after the search (FID, exact FD, the model's own metric)."""
