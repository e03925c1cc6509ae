# readlink: `ls -ld` of $1 if it is a symlink ("... $1 -> target"; illumos has no
# readlink(1)); never follows it.
if [ -L "$1" ]; then ls -ld -- "$1"; fi
