"""What every stage uses and that imports no other lymphnode package: the error family, atomic
file writes, run records (resume / refuse when the config changed), a process-pool runner and
validators."""
