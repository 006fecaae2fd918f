"""A torch.compile backend for tests: counts the graphs it is given and runs them as they are."""


class CountingBackend:
    """Counts compilations (``graphs``); each compiled graph runs as traced, no code generation."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward
