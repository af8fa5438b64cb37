"""One thin command line per DVC stage: parse, load config, call ``palm``, write atomically, log."""
