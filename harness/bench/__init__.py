"""`captioner bench` modes."""
