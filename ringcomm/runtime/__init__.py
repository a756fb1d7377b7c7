"""The runtime around a collective: session, same-call check, call board, liveness, comm queue, settings, trace."""
