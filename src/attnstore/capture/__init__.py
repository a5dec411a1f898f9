"""capture/: hooks on an unmodified lerobot Pi0.5 that stream attention to a writer. Never reads back."""
