//! Credentials never reach a log line or an error message.
//!
//! Source and sink addresses may carry secrets: `user:password@` in a URL's
//! authority and librdkafka settings such as `sasl.password=` in a query
//! string. Every message that names an address shows it through [`redact`],
//! which keeps what identifies the address (scheme, user, host, port, path,
//! the names of all options and the values of harmless ones) and replaces each
//! secret with `***`.

/// Option names whose values are secrets (matched as substrings, case
/// insensitive): librdkafka's `sasl.password`, `ssl.key.password`,
/// `ssl.keystore.password`, `sasl.oauthbearer.client.secret`,
/// `sasl.jaas.config`, `ssl.key.pem`, … and anything called a token.
const SECRET_KEYS: &[&str] = &["password", "secret", "token", "jaas", "oauthbearer.config", "key.pem", "credential"];

/// The placeholder written instead of a secret.
pub const HIDDEN: &str = "***";

/// Whether an option of this name holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|s| key.contains(s))
}

/// `spec` with the password of `user:password@` and the values of secret
/// options replaced by `***`. Works on any `scheme:…` address expmon takes
/// (`kafka://…`, `kairosdb:http://…`, `file:…`) and on plain text without a
/// scheme, which comes back unchanged unless it has those shapes.
pub fn redact(spec: &str) -> String {
    let (base, query) = match spec.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (spec, None),
    };
    let mut out = String::with_capacity(spec.len());
    match base.find("://") {
        Some(i) => {
            let (scheme, rest) = base.split_at(i + 3);
            out.push_str(scheme);
            // The authority ends at the first '/'; a password may hold '/' too,
            // so the userinfo is everything before the last '@' of the rest.
            match rest.rfind('@') {
                Some(at) => {
                    let (userinfo, host) = rest.split_at(at);
                    match userinfo.split_once(':') {
                        Some((user, _)) => {
                            out.push_str(user);
                            out.push(':');
                            out.push_str(HIDDEN);
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push_str(host);
                }
                None => out.push_str(rest),
            }
        }
        None => out.push_str(base),
    }
    if let Some(query) = query {
        out.push('?');
        for (i, kv) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match kv.split_once('=') {
                Some((k, _)) if is_secret_key(k) => {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(HIDDEN);
                }
                _ => out.push_str(kv),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_url_passwords_and_secret_options() {
        assert_eq!(
            redact("kairosdb:http://admin:s3cr3t@kairos:8080?batch=10"),
            "kairosdb:http://admin:***@kairos:8080?batch=10"
        );
        assert_eq!(redact("http://admin:pa@ss/w@h:1"), "http://admin:***@h:1");
        assert_eq!(
            redact("kafka://k1:9092/t?group=g&sasl.password=s3cr3t&sasl.username=u&ssl.key.password=x"),
            "kafka://k1:9092/t?group=g&sasl.password=***&sasl.username=u&ssl.key.password=***"
        );
        assert_eq!(
            redact("kafka://k:1/t?sasl.jaas.config=org.x required password=\"y\""),
            "kafka://k:1/t?sasl.jaas.config=***"
        );
        assert_eq!(redact("kafka://k:1/t?SASL.PASSWORD=p"), "kafka://k:1/t?SASL.PASSWORD=***");
    }

    #[test]
    fn keeps_what_has_no_secret() {
        for s in [
            "file:/tmp/x.jsonl",
            "null",
            "gen:demo?rate=10",
            "kafka://k:1/t?group=g&until_end=true",
            "http://u@h:1",
            "",
        ] {
            assert_eq!(redact(s), s);
        }
    }
}
