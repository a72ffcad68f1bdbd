"""homeiq-trainer: keeps HomeIQ's Ask AI model learning from its own history, driven over MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("homeiq-trainer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
