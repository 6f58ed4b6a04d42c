"""What every stage uses and that imports no other lymphnode package:

- ``errors``: the :class:`~lymphnode.core.errors.LymphnodeError` family;
- ``atomic``: atomic file writes (temp file in the same folder, fsync, ``os.replace``);
- ``records``: run records: resume with the same config, refuse another naming the keys;
- ``pool``: the process-pool runner (progress, cancel on error, workers die with the parent);
- ``validate``: integer / number / choice / config-section-key validators raising ConfigError
  (or a given class);
- ``boundary``: the one error boundary and logging setup of every CLI (exit 1 bad input, 2 bug).
"""
