# Shared by scripts/test and scripts/demo: install what is missing, keep .venv current.
# Sourced from the repository root.

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

# apt_install PKG...: install Debian packages, keeping services (the system sshd) from starting.
apt_install() {
    [ $# -gt 0 ] || return 0
    echo "sshpar: installing $*" >&2
    # A policy-rc.d that is already there (Docker images have one) is left as it is.
    local policy=/usr/sbin/policy-rc.d ours=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        ours=1
        trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    if [ -n "$ours" ]; then
        $sudo rm -f "$policy"
        trap - EXIT
    fi
}

# need_venv_packages: print the Debian packages needed to make .venv, if any.
need_venv_packages() {
    command -v python3 >/dev/null || echo python3
    if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo python3-venv
    fi
}

# venv_install EXTRAS: create .venv and install sshpar[EXTRAS] when pyproject.toml changed.
venv_install() {
    local extras="$1"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    local stamp=".venv/.sshpar-installed-${extras:-base}"
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
        echo "$want" >"$stamp"
    fi
}
