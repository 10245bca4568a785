"""The files that travel to the Hub with a saved model (see DESIGN.md, Hub rules)."""
