"""privacy: the release gate. Probes a trained model for memorised records and blocks release when it leaks."""
