"""psfw's version: one place, read by the package and by setuptools."""

__version__ = "0.1.0"
