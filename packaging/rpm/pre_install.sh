# allowsync %pre: create the allowsync user and group (the same line as
# /usr/lib/sysusers.d/allowsync.conf, which this package installs), so that the configuration
# can be installed 0640 root:allowsync.
systemd-sysusers --replace=/usr/lib/sysusers.d/allowsync.conf - <<'SYSUSERS' || :
u allowsync - "allowsync firewall allowlist daemon" /var/lib/allowsync /usr/sbin/nologin
SYSUSERS
