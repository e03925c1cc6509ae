# TEST CONTROL ONLY: the SmartOS backend's previous zone-root writer, which checks each
# path component and then uses the path again, so a zone process swapping a directory
# for a symlink in between redirects it (tests/smartos/test_zone_race.py shows it).
# The backend uses imgprep/backends/smartos/remote/zone.js.
#
# write: $1 zone root, $2 path relative to it, $3 octal mode, $4 octal mode of the
# directories it creates, $5 (optional) a symlink target: make a symlink instead of
# a file. A file's content comes on stdin. Refuses any existing component that is a
# symlink or not a directory, and a target that is a symlink or not a regular file.
# Run as `sh -c "$(cat write.sh)" imgprep-write ARGS...`; POSIX sh (illumos /bin/sh is ksh93).
set -eu
root=$1 rel=$2 mode=$3 dirmode=$4 link=${5-}
fail() { printf 'imgprep: %s\n' "$*" >&2; exit 3; }
[ -d "$root" ] && [ ! -L "$root" ] || fail "zone root $root is not a directory"
case /$rel/ in */../* | */./* | //*) fail "bad path $rel" ;; esac
cur=$root
dir=${rel%/*}
[ "$dir" = "$rel" ] && dir=
set -f
oldifs=$IFS
IFS=/
for part in $dir; do
    IFS=$oldifs
    [ -n "$part" ] || continue
    cur=$cur/$part
    [ -L "$cur" ] && fail "refusing to write through the symlink $cur"
    [ -e "$cur" ] || mkdir -m "$dirmode" "$cur"
    [ -d "$cur" ] || fail "$cur is not a directory"
done
IFS=$oldifs
target=$cur/${rel##*/}
if [ -L "$target" ] || { [ -e "$target" ] && [ ! -f "$target" ]; }; then
    fail "refusing to replace $target: not a regular file"
fi
rm -f "$target"
if [ -n "$link" ]; then
    ln -s "$link" "$target"
else
    (umask 077 && set -C && cat >"$target")
    chmod "$mode" "$target"
fi
