"""Built-in behaviour, written as ordinary plugins (see plugins.DEFAULT_PLUGINS)."""
