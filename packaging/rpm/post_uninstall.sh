# allowsync %postun: on upgrade, restart the service if it was running (the sets stay in place
# across the restart; the new daemon restores from the state file).
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 1 ]; then
		systemctl try-restart allowsync.service >/dev/null 2>&1 || :
	fi
fi
