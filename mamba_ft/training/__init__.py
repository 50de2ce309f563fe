"""Training: the run read top to bottom (`loop`), and the parts it is made of."""
