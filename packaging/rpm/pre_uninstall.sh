# allowsync %preun: on removal (not upgrade), stop and disable the service. The kernel's sets and
# rules stay in place (`allowsync teardown` removes them).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl --no-reload disable --now allowsync.service >/dev/null 2>&1 || :
fi
