"""genlab tests (a package, so that `tests.conftest` is ours and not a same-named package of a dependency)."""
