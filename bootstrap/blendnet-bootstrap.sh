#!/usr/bin/env bash
# blendnet-bootstrap.sh: turns a fresh Debian/Ubuntu cloud instance into a BlendNet render peer
# (DESIGN §9). Run as root at first boot (user data, startup-script); running it again is safe.
#
# What it does, in order:
#   1. checks its settings and the user data file, downloads a pinned Blender tarball and the
#      `blendnet` binary with curl into a temporary directory, and checks both SHA-256 sums;
#      on any mismatch it stops with `error: ...` and installs nothing;
#   2. (only when BLENDNET_ROOT is "/") installs the libraries Blender's official build needs
#      with apt-get;
#   3. unpacks Blender into $ROOT/opt/blender, installs $ROOT/usr/local/bin/blendnet, writes
#      $ROOT/etc/systemd/system/blendnet.service (`blendnet enroll --user-data ...`, restarted on
#      failure) and an idle watchdog (blendnet-idle-poweroff + its service and timer);
#   4. unless BLENDNET_NO_SYSTEMD=1: `systemctl daemon-reload`, then enables and starts the
#      service and the watchdog's timer.
#
# Settings (environment variables):
#   BLENDNET_BLENDER_URL     the official Blender tarball (.tar.xz, one top folder).
#                            Default: https://download.blender.org/release/Blender4.2/blender-4.2.0-linux-x64.tar.xz
#   BLENDNET_BLENDER_SHA256  its SHA-256, 64 hex digits. Required: there is no default, so a
#                            tarball is never trusted without a pin.
#   BLENDNET_BIN_URL         the `blendnet` binary (linux x86_64). Required.
#   BLENDNET_BIN_SHA256      its SHA-256, 64 hex digits. Required.
#   BLENDNET_USER_DATA       the user data file the provisioner gave this instance (JSON: mesh,
#                            bootstrap addresses, provisioner, one-time token), as an absolute
#                            path on the installed system; it must exist under BLENDNET_ROOT.
#                            Default: /var/lib/blendnet/user-data. (Fetching it from the cloud's
#                            metadata service is left to the caller.)
#   BLENDNET_ROOT            prefix of every path this script writes. Default: "/". Tests pass a
#                            scratch directory; with a root other than "/" apt-get is skipped and
#                            the script may run as any user.
#   BLENDNET_NO_SYSTEMD      "1": write the unit files but run no `systemctl` command.
#   BLENDNET_IDLE_POWEROFF_MINUTES
#                            the watchdog powers the machine off once the daemon has been
#                            unreachable, or has seen no peer, for this many minutes. Default: 30.
#                            0 turns the watchdog off (its files are still written, disabled).
#   BLENDNET_DOWNLOAD_TIMEOUT
#                            most seconds one download attempt may take. Default: 1800.
#
# Paths written (all under BLENDNET_ROOT):
#   opt/blender/                               Blender, top folder of the tarball stripped
#   usr/local/bin/blendnet                     the daemon, mode 0755
#   usr/local/bin/blendnet-idle-poweroff       the watchdog, mode 0755
#   etc/systemd/system/blendnet.service
#   etc/systemd/system/blendnet-idle-poweroff.service, .timer
#   var/lib/blendnet/node/                     the daemon's data dir, mode 0700
# Temporary downloads go to a directory under $TMPDIR (default /tmp), removed on exit.
set -euo pipefail
umask 022

readonly DEFAULT_BLENDER_URL="https://download.blender.org/release/Blender4.2/blender-4.2.0-linux-x64.tar.xz"
# Shared libraries the official Linux build of Blender loads even in background mode.
readonly BLENDER_APT_PACKAGES=(
    libx11-6 libxi6 libxrender1 libxxf86vm1 libxfixes3 libxkbcommon0 libsm6 libgl1 libegl1
)

log() { printf 'blendnet-bootstrap: %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

blender_url="${BLENDNET_BLENDER_URL:-$DEFAULT_BLENDER_URL}"
blender_sha="${BLENDNET_BLENDER_SHA256:-}"
bin_url="${BLENDNET_BIN_URL:-}"
bin_sha="${BLENDNET_BIN_SHA256:-}"
user_data="${BLENDNET_USER_DATA:-/var/lib/blendnet/user-data}"
root="${BLENDNET_ROOT:-/}"
no_systemd="${BLENDNET_NO_SYSTEMD:-0}"
idle_minutes="${BLENDNET_IDLE_POWEROFF_MINUTES:-30}"
download_timeout="${BLENDNET_DOWNLOAD_TIMEOUT:-1800}"

# Paths on the installed system (what the units name) and their place under the root.
readonly SYS_BLENDER_DIR=/opt/blender
readonly SYS_BIN=/usr/local/bin/blendnet
readonly SYS_WATCHDOG=/usr/local/bin/blendnet-idle-poweroff
readonly SYS_UNIT_DIR=/etc/systemd/system
readonly SYS_DATA_DIR=/var/lib/blendnet/node

# --- settings -----------------------------------------------------------------------------

[[ $root == /* ]] || die "BLENDNET_ROOT must be an absolute path, not '$root'"
[[ -d $root ]] || die "BLENDNET_ROOT '$root' is not a directory"
root="${root%/}" # "" for "/": every path below is "$root/..."
if [[ -z $root && $(id -u) -ne 0 ]]; then
    die "run this as root (or set BLENDNET_ROOT to a scratch directory)"
fi
[[ $blender_url == http://* || $blender_url == https://* ]] ||
    die "BLENDNET_BLENDER_URL must be an http(s) URL, not '$blender_url'"
[[ -n $bin_url ]] || die "BLENDNET_BIN_URL is not set: give the URL of the blendnet binary"
[[ $bin_url == http://* || $bin_url == https://* ]] ||
    die "BLENDNET_BIN_URL must be an http(s) URL, not '$bin_url'"
check_sha_setting() { # NAME VALUE
    [[ -n $2 ]] || die "$1 is not set: give the SHA-256 (64 hex digits) of the file to install"
    [[ $2 =~ ^[0-9a-fA-F]{64}$ ]] || die "$1 must be 64 hex digits, not '$2'"
}
check_sha_setting BLENDNET_BLENDER_SHA256 "$blender_sha"
check_sha_setting BLENDNET_BIN_SHA256 "$bin_sha"
blender_sha="${blender_sha,,}"
bin_sha="${bin_sha,,}"
[[ $user_data == /* ]] || die "BLENDNET_USER_DATA must be an absolute path, not '$user_data'"
[[ $user_data != *[[:space:]\"\\%]* ]] ||
    die "BLENDNET_USER_DATA must not contain spaces, quotes, backslashes or '%': '$user_data'"
[[ -f "$root$user_data" ]] ||
    die "the user data file $root$user_data does not exist (set BLENDNET_USER_DATA)"
[[ $idle_minutes =~ ^[0-9]+$ ]] ||
    die "BLENDNET_IDLE_POWEROFF_MINUTES must be a whole number of minutes, not '$idle_minutes'"
[[ $download_timeout =~ ^[1-9][0-9]*$ ]] ||
    die "BLENDNET_DOWNLOAD_TIMEOUT must be a positive number of seconds, not '$download_timeout'"
[[ $no_systemd == 0 || $no_systemd == 1 ]] ||
    die "BLENDNET_NO_SYSTEMD must be 0 or 1, not '$no_systemd'"

for tool in curl sha256sum tar xz install mktemp; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "'$tool' is missing: install it (apt-get install curl coreutils tar xz-utils)"
done

# --- download and verify ------------------------------------------------------------------

work="$(mktemp -d "${TMPDIR:-/tmp}/blendnet-bootstrap.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

download() { # URL FILE
    log "downloading $1"
    curl -q --fail --silent --show-error --location \
        --retry 5 --retry-delay 3 --retry-connrefused \
        --connect-timeout 30 --max-time "$download_timeout" \
        --output "$2" "$1" ||
        die "cannot download $1 (curl failed, see above)"
}

verify() { # NAME FILE EXPECTED
    local actual
    actual="$(sha256sum "$2" | cut -d' ' -f1)"
    [[ $actual == "$3" ]] ||
        die "SHA-256 mismatch for $1 ($2): expected $3, got $actual; nothing was installed"
    log "verified $1: sha256 $actual"
}

blender_name="${blender_url##*/}"
blender_name="${blender_name%%\?*}"
[[ $blender_name == *.tar.* || $blender_name == *.tgz || $blender_name == *.txz ]] ||
    blender_name="blender.tar.xz"
download "$blender_url" "$work/$blender_name"
download "$bin_url" "$work/blendnet"
verify "the Blender tarball $blender_name" "$work/$blender_name" "$blender_sha"
verify "the blendnet binary" "$work/blendnet" "$bin_sha"

# Unpack before touching the root, so a broken archive installs nothing either.
mkdir "$work/blender"
tar -xf "$work/$blender_name" -C "$work/blender" --strip-components=1 --no-same-owner ||
    die "cannot unpack $blender_name; nothing was installed"
[[ -f "$work/blender/blender" ]] ||
    die "$blender_name has no blender executable in its top folder; nothing was installed"

# --- system packages ----------------------------------------------------------------------

if [[ -z $root ]]; then
    if command -v apt-get >/dev/null 2>&1; then
        log "installing Blender's libraries: ${BLENDER_APT_PACKAGES[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${BLENDER_APT_PACKAGES[@]}" ||
            die "cannot install Blender's libraries with apt-get"
    else
        log "no apt-get here: make sure Blender's libraries are installed (${BLENDER_APT_PACKAGES[*]})"
    fi
fi

# --- install ------------------------------------------------------------------------------

# Writes stdin to FILE with MODE, through a temporary file in the same directory and a rename,
# so a reader never sees half a file and a running executable is replaced, not overwritten.
write_file() { # FILE MODE
    local dir tmp
    dir="$(dirname "$1")"
    mkdir -p "$dir"
    tmp="$(mktemp "$dir/.$(basename "$1").XXXXXX")"
    cat >"$tmp"
    chmod "$2" "$tmp"
    mv -f "$tmp" "$1"
}

log "installing Blender into $root$SYS_BLENDER_DIR"
mkdir -p "$root/opt"
rm -rf "$root$SYS_BLENDER_DIR.new" "$root$SYS_BLENDER_DIR.old"
mv "$work/blender" "$root$SYS_BLENDER_DIR.new"
if [[ -e "$root$SYS_BLENDER_DIR" ]]; then
    mv "$root$SYS_BLENDER_DIR" "$root$SYS_BLENDER_DIR.old"
fi
mv "$root$SYS_BLENDER_DIR.new" "$root$SYS_BLENDER_DIR"
rm -rf "$root$SYS_BLENDER_DIR.old"
chmod 0755 "$root$SYS_BLENDER_DIR" "$root$SYS_BLENDER_DIR/blender"
version="$("$root$SYS_BLENDER_DIR/blender" --version 2>&1)" ||
    die "the installed Blender does not run: $root$SYS_BLENDER_DIR/blender --version says: $version"
log "installed ${version%%$'\n'*}"

log "installing $root$SYS_BIN"
write_file "$root$SYS_BIN" 0755 <"$work/blendnet"

mkdir -p "$root$SYS_DATA_DIR"
chmod 0700 "$root$SYS_DATA_DIR"

log "writing $root$SYS_UNIT_DIR/blendnet.service"
write_file "$root$SYS_UNIT_DIR/blendnet.service" 0644 <<EOF
# Written by blendnet-bootstrap.sh: a BlendNet render peer that enrolls with its user data.
[Unit]
Description=BlendNet render peer
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=$SYS_BIN enroll --user-data $user_data --data-dir $SYS_DATA_DIR --blender $SYS_BLENDER_DIR/blender --no-mdns
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
EOF

# The watchdog: run every minute by a timer. The node counts as healthy when
# `blendnet status --json` answers and reports at least one online peer; once it has been
# unhealthy for longer than the limit, the machine powers itself off. The time it first saw the
# node unhealthy lives in /run (cleared at boot), so a reboot starts the count again.
log "writing the idle watchdog $root$SYS_WATCHDOG (power off after $idle_minutes minutes)"
write_file "$root$SYS_WATCHDOG" 0755 <<EOF
#!/usr/bin/env bash
# Written by blendnet-bootstrap.sh. Powers this machine off once the BlendNet daemon has been
# unreachable, or has had no online peer (its provisioner gone), for $idle_minutes minutes.
# Run every minute by blendnet-idle-poweroff.timer.
set -euo pipefail
limit_minutes=$idle_minutes
state=/run/blendnet-unhealthy-since
if out="\$(timeout 30 $SYS_BIN status --json --data-dir $SYS_DATA_DIR 2>/dev/null)" &&
    grep -Eq '"peer_count"[[:space:]]*:[[:space:]]*[1-9]' <<<"\$out"; then
    rm -f "\$state"
    exit 0
fi
now="\$(date +%s)"
[[ -s \$state ]] || echo "\$now" >"\$state"
since="\$(cat "\$state")"
if ((now - since >= limit_minutes * 60)); then
    echo "blendnet-idle-poweroff: no healthy daemon for \$(((now - since) / 60)) minutes: powering off"
    systemctl poweroff
else
    echo "blendnet-idle-poweroff: daemon unreachable or without peers for \$((now - since)) s (limit \$((limit_minutes * 60)) s)"
fi
EOF
write_file "$root$SYS_UNIT_DIR/blendnet-idle-poweroff.service" 0644 <<EOF
# Written by blendnet-bootstrap.sh.
[Unit]
Description=Power off when the BlendNet daemon or its mesh is gone

[Service]
Type=oneshot
ExecStart=$SYS_WATCHDOG
EOF
write_file "$root$SYS_UNIT_DIR/blendnet-idle-poweroff.timer" 0644 <<EOF
# Written by blendnet-bootstrap.sh.
[Unit]
Description=Check the BlendNet daemon every minute; power off when it has been gone too long

[Timer]
OnBootSec=1min
OnUnitActiveSec=1min
AccuracySec=10s

[Install]
WantedBy=timers.target
EOF

# --- start --------------------------------------------------------------------------------

if [[ $no_systemd == 1 ]]; then
    log "BLENDNET_NO_SYSTEMD=1: not running systemctl"
else
    command -v systemctl >/dev/null 2>&1 ||
        die "systemctl is missing: this script needs systemd (or BLENDNET_NO_SYSTEMD=1)"
    systemctl daemon-reload || die "systemctl daemon-reload failed"
    systemctl enable blendnet.service || die "cannot enable blendnet.service"
    # `restart`, not `start`: a second run replaces a daemon running the old binary.
    systemctl restart blendnet.service || die "cannot start blendnet.service"
    if ((idle_minutes > 0)); then
        systemctl enable --now blendnet-idle-poweroff.timer ||
            die "cannot start blendnet-idle-poweroff.timer"
    else
        systemctl disable --now blendnet-idle-poweroff.timer || true
    fi
    log "blendnet.service is running: journalctl -u blendnet follows it"
fi
log "done"
