//! The mock Chat API the `once` and cycle sections sync from, on a runtime of its own.

use std::path::{Path, PathBuf};

use allowsync_testkit::mock::{MockChatApi, MockConfig, MockHandle};
use ipnet::IpNet;

pub const KEY: &str = "bench-secret-key";

/// The mock API, on a runtime of its own (its CPU time is not allowsync's).
pub struct Api {
    pub mock: MockHandle,
    pub _rt: tokio::runtime::Runtime,
}

pub const NETTYPES: [u8; 7] = [0, 1, 2, 3, 4, 5, 6];

impl Api {
    pub fn start() -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mock =
            rt.block_on(MockChatApi::start(MockConfig::new(1400000000, "administrator", KEY))).unwrap();
        Api { mock, _rt: rt }
    }

    /// Serves `nets` spread over every nettype (GetIPList answers are capped at 1 MiB each, so
    /// 100k entries need more than one list).
    pub fn serve(&self, nets: &[IpNet]) {
        for (k, &t) in NETTYPES.iter().enumerate() {
            let list: Vec<String> =
                nets.iter().skip(k).step_by(NETTYPES.len()).map(|n| n.to_string()).collect();
            self.mock.set_list(t, list);
        }
    }

    pub fn config(&self, dir: &Path) -> PathBuf {
        self.config_with(dir, "nftables: { table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }")
    }

    /// [`Api::config`] with another `backend:` (one line of YAML).
    pub fn config_with(&self, dir: &Path, backend: &str) -> PathBuf {
        std::fs::write(dir.join("key"), KEY).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let yaml = format!(
            "interval: 5m
state_file: state.json
sources:
  - name: chat
    tencent_chat:
      endpoint: {url}
      sdkappid: 1400000000
      identifier: administrator
      secret_key_file: key
      nettypes: [0, 1, 2, 3, 4, 5, 6]
      timeout: 30s
backend:
  {backend}
safety:
  max_removal_percent: 100
  # A cold run loads up to 100k addresses at once: past the widening guard's default.
  max_added_addresses_v4: 4294967296
log:
  format: text
  level: warn
",
            url = self.mock.url()
        );
        let p = dir.join("config.yaml");
        std::fs::write(&p, yaml).unwrap();
        p
    }
}
