#!/usr/bin/env bash
# Proves the image's build context without a Docker daemon: copies exactly what
# the Dockerfile's build stage COPYs (its first stage; `COPY --from` lines are
# left out) into an empty directory, laid out as the stage's WORKDIR would hold
# it, and compiles the crate there (`cargo check`: every macro that reads a file
# at compile time, `env!` of build.rs and sqlx's migrations, runs as in the
# image's release build), offline, against the registry that `cargo fetch`
# filled. A file the build needs and the Dockerfile leaves out (build.rs, a
# migration folder) fails this, as it would fail `docker build`.
#
#   scripts/docker-context.sh [Dockerfile]
set -euo pipefail
cd "$(dirname "$0")/.."
dockerfile="${1:-Dockerfile}"

context=$(mktemp -d /tmp/dwh-helper-docker-context.XXXXXX)
trap 'rm -rf "$context"' EXIT
# Compiled dependencies are kept between runs, beside this checkout's own.
target="$PWD/target/docker-context"

# The build stage: from the first FROM to the next one.
stage=$(awk 'toupper($1) == "FROM" { n++; next } n == 1' "$dockerfile")
copies=$(printf '%s\n' "$stage" | awk 'toupper($1) == "COPY" && $2 !~ /^--from/ { $1 = ""; print }')
if [ -z "$copies" ]; then
  echo "scripts/docker-context.sh: $dockerfile has no COPY in its build stage" >&2
  exit 1
fi
while read -r -a words; do
  # COPY src... dest: the last word is where, relative to WORKDIR.
  dest="${words[${#words[@]}-1]}"
  unset 'words[${#words[@]}-1]'
  for src in "${words[@]}"; do
    case "$src" in --*) continue ;; esac
    if [ ! -e "$src" ]; then
      echo "scripts/docker-context.sh: $dockerfile copies $src, which does not exist" >&2
      exit 1
    fi
    if [ -d "$src" ]; then
      mkdir -p "$context/$dest"
      cp -R "$src/." "$context/$dest/"
    else
      case "$dest" in
        */) mkdir -p "$context/$dest"; cp "$src" "$context/$dest" ;;
        *) mkdir -p "$(dirname "$context/$dest")"; cp "$src" "$context/$dest" ;;
      esac
    fi
  done
done <<< "$copies"

echo "scripts/docker-context.sh: the build stage copies: $(cd "$context" && ls -A | tr '\n' ' ')"
cargo fetch --locked >/dev/null
# The image's build, checked, with nothing of this checkout (no .git, no
# target) in reach. Without the commit in the environment, so that build.rs,
# which sets it, must be in the context.
(cd "$context" && env -u DWH_HELPER_GIT_COMMIT CARGO_TARGET_DIR="$target" \
  cargo check --locked --offline --quiet)
echo "scripts/docker-context.sh: the image's build stage builds from its COPY lines alone"
