#!/usr/bin/env bash
# Install PostgreSQL 15 and the pgvector extension on Debian 12 (bookworm), for genlab's server RAG store.
# Idempotent: does nothing that is already done. Needs root.
#
# Bookworm has no postgresql-15-pgvector package, so pgvector is built from Debian trixie's source package:
# a temporary trixie deb-src entry (removed on exit), `apt-get source pgvector`, `make install` against
# PostgreSQL 15's pg_config (OPTFLAGS="": no -march=native, the build runs on any x86-64).
set -euo pipefail

PG=15
PG_CONFIG=/usr/lib/postgresql/$PG/bin/pg_config
APT=(apt-get -y -q -o DPkg::Lock::Timeout=600)
SRC_LIST=/etc/apt/sources.list.d/genlab-trixie-src.sources
say() { echo "[install-pgvector] $*"; }

[[ $(id -u) -eq 0 ]] || { echo "install-pgvector.sh needs root (try: sudo $0)" >&2; exit 1; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# 1. PostgreSQL server and the headers/PGXS needed to build an extension.
need=()
for pkg in postgresql-$PG postgresql-server-dev-$PG; do installed "$pkg" || need+=("$pkg"); done
if ((${#need[@]})); then
    say "apt-get install ${need[*]}"
    if ! "${APT[@]}" install "${need[@]}"; then
        say "install failed; apt-get update and retry"
        "${APT[@]}" update
        "${APT[@]}" install "${need[@]}"
    fi
else
    say "postgresql-$PG and postgresql-server-dev-$PG already installed"
fi

EXT_DIR="$($PG_CONFIG --sharedir)/extension"
LIB_DIR="$($PG_CONFIG --pkglibdir)"

# 2. pgvector: a package if apt has one, else built from the Debian source package.
if [[ -f $EXT_DIR/vector.control ]]; then
    say "pgvector already installed ($EXT_DIR/vector.control)"
elif apt-cache show "postgresql-$PG-pgvector" >/dev/null 2>&1; then
    say "apt-get install postgresql-$PG-pgvector"
    "${APT[@]}" install "postgresql-$PG-pgvector"
else
    say "no postgresql-$PG-pgvector package: building pgvector from Debian trixie's source package"
    tmp=$(mktemp -d)
    chmod 755 "$tmp"; chown _apt "$tmp" 2>/dev/null || true   # apt-get source downloads as the _apt user
    had_trixie_lists=$(compgen -G "/var/lib/apt/lists/*_dists_trixie_*" || true)
    cleanup() {
        say "cleanup: removing $SRC_LIST and $tmp"
        rm -f "$SRC_LIST"
        rm -rf "$tmp"
        # Forget the trixie source index we fetched (only if it was not there before).
        [[ -n $had_trixie_lists ]] || rm -f /var/lib/apt/lists/*_dists_trixie_*
    }
    trap cleanup EXIT
    cat >"$SRC_LIST" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    say "apt-get update (with a temporary trixie deb-src entry)"
    "${APT[@]}" update
    say "apt-get source pgvector (in $tmp)"
    (cd "$tmp" && apt-get -q source pgvector)
    srcdir=$(find "$tmp" -maxdepth 1 -mindepth 1 -type d -name 'pgvector-*' | head -n1)
    [[ -n $srcdir ]] || { echo "apt-get source pgvector unpacked nothing in $tmp" >&2; exit 1; }
    say "make install in $srcdir (PG_CONFIG=$PG_CONFIG, OPTFLAGS='')"
    make -C "$srcdir" -j1 PG_CONFIG="$PG_CONFIG" OPTFLAGS="" with_llvm=no
    make -C "$srcdir" -j1 PG_CONFIG="$PG_CONFIG" OPTFLAGS="" with_llvm=no install
fi

# 3. Verify.
for f in "$EXT_DIR/vector.control" "$LIB_DIR/vector.so"; do
    [[ -f $f ]] || { echo "pgvector install incomplete: $f is missing" >&2; exit 1; }
done
say "ok: pgvector $(sed -n "s/^default_version = '\(.*\)'/\1/p" "$EXT_DIR/vector.control") in $EXT_DIR"
