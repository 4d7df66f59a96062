# Sourced by the scripts that run on the GPU host (studies/weak_7scenes.sh, benchmarks/issue18_gpu.sh),
# whose Python lacks packages the project needs (PyAV, pyzmq, the XFeat matcher):
#   device_site PYTHON DIR...
# unpacks the site.tar.xz of each DIR (benchmarks/pack_site.py: wheels as their installed tree), then
# installs each DIR's wheels with PYTHON's pip, into $SITE (default /tmp/site), and appends $SITE to
# PYTHONPATH. Absent or empty folders are skipped. Returns 1, after saying what failed on stderr,
# when an archive or an install fails; the caller decides whether to go on.
device_site() {
  local py=$1 dir site=${SITE:-/tmp/site} wheels=()
  shift
  mkdir -p "$site" || return 1
  for dir in "$@"; do
    if [ -f "$dir/site.tar.xz" ]; then
      echo "unpacking $dir/site.tar.xz into $site" >&2
      tar -C "$site" -xJf "$dir/site.tar.xz" || { echo "unpacking $dir/site.tar.xz failed" >&2; return 1; }
    fi
    compgen -G "$dir/*.whl" >/dev/null && wheels+=("$dir"/*.whl)
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing ${#wheels[@]} wheel(s) into $site" >&2
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${wheels[@]}" >&2 || { echo "installing ${wheels[*]} failed" >&2; return 1; }
  fi
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$site
}
