"""xm2: reproduce, study and extend the Xmodel-2 training recipe."""

__version__ = "0.1.0"
