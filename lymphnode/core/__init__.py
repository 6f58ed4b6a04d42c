"""What every stage uses and that imports no other lymphnode package:

- ``errors``: the :class:`~lymphnode.core.errors.LymphnodeError` family;
- ``atomic``: atomic file writes (temp file in the same folder, fsync, ``os.replace``);
- ``records``: run records: resume with the same config, refuse another naming the keys;
- ``pool``: the process-pool runner (progress, cancel on error, workers die with the parent);
- ``validate``: integer / number / choice validators raising ConfigError (or a given class).
"""
