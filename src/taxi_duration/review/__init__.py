"""What people read: rendered reports, the gallery and trends, run comparison, reopening a past run."""
