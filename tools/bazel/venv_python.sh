#!/bin/sh
# The py_runtime interpreter of Bazel's Python rules: the repository's .venv Python. Bazel runs this file
# through symlinks (runfiles, sandbox); the real path locates the repository.
here=$(dirname "$(readlink -f "$0")")
python="$here/../../.venv/bin/python"
if [ ! -x "$python" ]; then
  echo "error: $python does not exist; run make deps in the repository first" >&2
  exit 2
fi
exec "$python" "$@"
