"""Operations: metrics, usage accounting, logs, the admin listener."""
