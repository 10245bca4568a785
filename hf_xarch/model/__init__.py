"""The files that travel to the Hub with a saved model (see the README's "Sharing models")."""
