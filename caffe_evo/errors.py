"""The one exception type that the CLI turns into a single clear error line."""


class CaffeEvoError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Raised wherever bad input is detected (corrupt weights, a missing LMDB, nonsense options), so that
    the CLI can print ``caffe-evo: <message>`` instead of a traceback from deep inside.
    """


class SelectionExhausted(CaffeEvoError):
    """Natural selection found no offspring above the floor in the allowed attempts; the lineage written
    so far is complete and kept."""
