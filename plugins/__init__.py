"""robustness-bench built-in plugins (imported as `bench_plugins`): one plugin per module,
registered through the same entry-point group as any third-party package."""
