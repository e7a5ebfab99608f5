//! Admin API credentials for tests: an auth file with one token per role, in a temporary
//! directory. The end-to-end tests run with it by default ([`crate::EnvOptions::admin_auth`]).

use std::path::PathBuf;

use taskfactory_trigger::auth::file::new_token;

/// One token per role, and the auth file that holds their hashes.
pub struct AdminTokens {
    pub file: PathBuf,
    pub admin: String,
    pub editor: String,
    pub operator: String,
    pub viewer: String,
    _dir: tempfile::TempDir,
}

impl AdminTokens {
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let tokens = Self {
            file: dir.path().join("auth.yaml"),
            admin: new_token().0,
            editor: new_token().0,
            operator: new_token().0,
            viewer: new_token().0,
            _dir: dir,
        };
        tokens.write("")?;
        Ok(tokens)
    }

    /// Writes the file: the four tokens (subjects `test-admin`, `test-editor`, …), then `extra`
    /// (more YAML list entries under `tokens:`, indented by two spaces).
    pub fn write(&self, extra: &str) -> anyhow::Result<()> {
        self.write_document(&format!("tokens:\n{}{extra}", self.entries()))
    }

    /// The four standard entries, as YAML list items.
    pub fn entries(&self) -> String {
        [
            ("test-admin", &self.admin, "admin"),
            ("test-editor", &self.editor, "editor"),
            ("test-operator", &self.operator, "operator"),
            ("test-viewer", &self.viewer, "viewer"),
        ]
        .iter()
        .map(|(subject, token, role)| token_entry(subject, token, &[role]))
        .collect()
    }

    /// Replaces the whole file (atomically, as a Kubernetes secret update does).
    pub fn write_document(&self, yaml: &str) -> anyhow::Result<()> {
        let temporary = self.file.with_extension("tmp");
        std::fs::write(&temporary, yaml)?;
        std::fs::rename(&temporary, &self.file)?;
        Ok(())
    }
}

/// One `tokens:` list item for `token` with these roles.
pub fn token_entry(subject: &str, token: &str, roles: &[&str]) -> String {
    format!(
        "  - subject: {subject}\n    sha256: {}\n    roles: {}\n",
        taskfactory_trigger::auth::file::token_hash_hex(token),
        serde_json::to_string(roles).expect("strings serialize")
    )
}
