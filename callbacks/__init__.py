"""Lightning callbacks that record what a run did; each is usable on its own."""
