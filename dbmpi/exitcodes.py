"""The exit codes of ``dbmpi`` (every rank of a job exits with the same one)."""

OK = 0            # done: max_steps, max_time_s or target_accuracy reached
FAILED = 1        # a rank failed (its error names it); the job was aborted
USAGE = 2         # bad config, data, checkpoint or rank count; nothing was trained
DIVERGED = 3      # training diverged (NaN/Inf); the checkpoint holds the last finite values
PREEMPTED = 75    # EX_TEMPFAIL: SIGTERM/SIGUSR1 arrived, checkpointed; resume with --resume
