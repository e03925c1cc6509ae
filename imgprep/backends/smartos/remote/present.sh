# present: prints each argument that exists (a dangling symlink counts).
for p; do
    if [ -e "$p" ] || [ -L "$p" ]; then printf '%s\n' "$p"; fi
done
