"""Configuration: :class:`~config.settings.Settings` and :func:`~config.settings.load_settings`."""

from config.settings import ConfigError, Settings, build_settings, load_settings

__all__ = ["ConfigError", "Settings", "build_settings", "load_settings"]
