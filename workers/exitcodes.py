"""Reserved worker exit codes, shared with the supervisor (this module imports nothing)."""

EXIT_OK = 0
EXIT_LOAD_FAILED = 64
EXIT_WARMUP_FAILED = 65
EXIT_VALIDATION_FAILED = 66
EXIT_STANDBY_FAILED = 67
EXIT_SANDBOX_FAILED = 68  # sandbox = true and the kernel cannot confine the worker
EXIT_ORPHANED = 70
EXIT_INTERNAL = 71

EXIT_MEANING = {
    EXIT_OK: "clean exit",
    EXIT_LOAD_FAILED: "model failed to load",
    EXIT_WARMUP_FAILED: "warm-up failed",
    EXIT_VALIDATION_FAILED: "golden validation failed",
    EXIT_STANDBY_FAILED: "standby could not prepare its device",
    EXIT_SANDBOX_FAILED: "sandbox could not be applied",
    EXIT_ORPHANED: "poold went away",
    EXIT_INTERNAL: "internal worker error",
}
# Exits that mean "this model cannot start": restarting it would only fail again.
BOOT_FAILURES = frozenset(
    {EXIT_LOAD_FAILED, EXIT_WARMUP_FAILED, EXIT_VALIDATION_FAILED, EXIT_SANDBOX_FAILED}
)
# Exits whose worker sends its reason as an event first (the supervisor waits for it).
REASONED_EXITS = BOOT_FAILURES | {EXIT_INTERNAL}
