//! What an instance is told at boot, in its user data (AWS) or metadata (GCP): only how to
//! reach the mesh and a one-time token to enroll with (DESIGN §9). No credentials, no mesh key:
//! whoever reads the user data can at most spend the token once, before it expires.

use serde::{Deserialize, Serialize};

/// AWS caps user data at 16 KiB; GCP's metadata values are larger, but one limit suits both.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;
/// The format's version; an instance refuses others.
pub const USER_DATA_VERSION: u32 = 1;
/// Most bootstrap addresses listed.
pub const MAX_BOOTSTRAP: usize = 32;

/// The boot payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserData {
    pub version: u32,
    /// The mesh id the instance joins.
    pub mesh: String,
    /// Addresses of the provisioner and other members (multiaddrs ending in `/p2p/<peer id>`).
    pub bootstrap: Vec<String>,
    /// The provisioner's peer id (its public key): the instance only accepts a certificate
    /// signed through it.
    pub provisioner: String,
    /// The one-time enrollment token (an invite code with the `render` role).
    pub token: String,
    /// Unix seconds after which the token is worthless.
    pub expires_at: u64,
    /// The cloud whose preemption notices the instance watches (`aws`, `gcp`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemption: Option<String>,
    /// The cloud (`aws`, `gcp`) whose signed identity the instance sends with its token: set
    /// when the provisioner's invite demands it (DESIGN §9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// What an hour of the instance costs, in millionths of a US dollar: the price the
    /// provider quoted for the instance type and zone it was launched in (a spot price moves
    /// after launch; this is the one at launch). `blendnet enroll` makes it the instance's
    /// `price_per_hour`, so the tasks it renders carry their cost. Absent when the provider
    /// named no price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour_micros: Option<u64>,
}

/// Why user data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    #[error("the user data is {0} bytes, more than {MAX_USER_DATA_BYTES}")]
    TooLarge(usize),
    #[error("the user data is not BlendNet's: {0}")]
    Malformed(String),
    #[error("the user data is format version {0}; this blendnet reads version {USER_DATA_VERSION}")]
    Version(u32),
    #[error("the user data has no {0}")]
    Missing(&'static str),
    #[error("the user data lists {0} bootstrap addresses, more than {MAX_BOOTSTRAP}")]
    TooManyAddresses(usize),
    #[error("the enrollment token expired at {expired_at} (now {now}): this instance is too late")]
    Expired { expired_at: u64, now: u64 },
}

impl UserData {
    /// The text put in the instance's user data.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads and checks user data at `now` (Unix seconds).
    pub fn parse(text: &str, now: u64) -> Result<UserData, UserDataError> {
        if text.len() > MAX_USER_DATA_BYTES {
            return Err(UserDataError::TooLarge(text.len()));
        }
        let data: UserData = serde_json::from_str(text.trim())
            .map_err(|e| UserDataError::Malformed(e.to_string()))?;
        if data.version != USER_DATA_VERSION {
            return Err(UserDataError::Version(data.version));
        }
        for (field, value) in [
            ("mesh", &data.mesh),
            ("provisioner", &data.provisioner),
            ("token", &data.token),
        ] {
            if value.trim().is_empty() {
                return Err(UserDataError::Missing(field));
            }
        }
        if data.bootstrap.is_empty() {
            return Err(UserDataError::Missing("bootstrap address"));
        }
        if data.bootstrap.len() > MAX_BOOTSTRAP {
            return Err(UserDataError::TooManyAddresses(data.bootstrap.len()));
        }
        if now > data.expires_at {
            return Err(UserDataError::Expired {
                expired_at: data.expires_at,
                now,
            });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> UserData {
        UserData {
            version: USER_DATA_VERSION,
            mesh: "l2bq63h5".into(),
            bootstrap: vec!["/ip4/10.0.0.1/tcp/7741/p2p/12D3KooWabc".into()],
            provisioner: "12D3KooWabc".into(),
            token: "BN1xyz".into(),
            expires_at: 1_000,
            preemption: Some("aws".into()),
            identity: Some("aws".into()),
            price_per_hour_micros: Some(41_600),
        }
    }

    #[tokio::test]
    async fn each_launch_tells_its_instance_the_price_it_was_launched_at() {
        let dir = tempfile::tempdir().unwrap();
        let provider =
            crate::local::LocalProvider::new(dir.path(), vec!["true".into()]).with_price(0.0416);
        let unpriced = UserData {
            price_per_hour_micros: None,
            ..sample()
        };
        let specs = crate::launch_specs(&provider, None, true, &unpriced, "tag")
            .await
            .unwrap();
        assert!(!specs.is_empty());
        for spec in specs {
            let data = UserData::parse(&spec.user_data, 999).unwrap();
            assert_eq!(data.price_per_hour_micros, Some(41_600), "{data:?}");
        }
    }

    #[test]
    fn user_data_round_trips_and_is_checked() {
        let text = sample().encode();
        assert_eq!(UserData::parse(&text, 999), Ok(sample()));
        // Without preemption notices to watch (the local provider), the field is left out.
        let local = UserData {
            preemption: None,
            identity: None,
            price_per_hour_micros: None,
            ..sample()
        };
        assert!(!local.encode().contains("preemption"));
        assert!(!local.encode().contains("identity"));
        assert!(!local.encode().contains("price"));
        assert_eq!(UserData::parse(&local.encode(), 999), Ok(local));
        assert_eq!(
            UserData::parse(&text, 1_001),
            Err(UserDataError::Expired {
                expired_at: 1_000,
                now: 1_001
            })
        );
        let mut other = sample();
        other.version = 2;
        assert_eq!(
            UserData::parse(&other.encode(), 0),
            Err(UserDataError::Version(2))
        );
        other = sample();
        other.token = " ".into();
        assert_eq!(
            UserData::parse(&other.encode(), 0),
            Err(UserDataError::Missing("token"))
        );
        other = sample();
        other.bootstrap.clear();
        assert_eq!(
            UserData::parse(&other.encode(), 0),
            Err(UserDataError::Missing("bootstrap address"))
        );
        assert!(matches!(
            UserData::parse("#!/bin/sh\necho hi", 0),
            Err(UserDataError::Malformed(_))
        ));
        let unknown = text.replace("\"version\"", "\"secret\":1,\"version\"");
        assert!(matches!(
            UserData::parse(&unknown, 0),
            Err(UserDataError::Malformed(_))
        ));
        assert_eq!(
            UserData::parse(&" ".repeat(MAX_USER_DATA_BYTES + 1), 0),
            Err(UserDataError::TooLarge(MAX_USER_DATA_BYTES + 1))
        );
    }
}
