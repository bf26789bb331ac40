//! etcd's own authentication for a cluster: every host is an etcd user named by its
//! certificate's common name (etcd runs with `--client-cert-auth`, so no password is
//! involved), and its one role may read and write the cluster's prefix and nothing
//! else. `root` (a tool's certificate) sets this up and keeps every right.

use etcd_client::{Permission, UserAddOptions};

use crate::{Store, StoreError};

/// The role every host of the cluster has.
pub const HOST_ROLE: &str = "ferry-host";

impl Store {
    /// Run as `root` once, before authentication is on: creates `root`, the hosts'
    /// role limited to this store's prefix, and a user per host; then turns
    /// authentication on.
    pub async fn enable_auth(&self, hosts: &[String]) -> Result<(), StoreError> {
        let mut client = self.client();
        let no_password = || Some(UserAddOptions::new().with_no_pwd());
        client
            .user_add("root", "", no_password())
            .await
            .map_err(|error| self.etcd_error(error))?;
        client
            .user_grant_role("root", "root")
            .await
            .map_err(|error| self.etcd_error(error))?;
        client
            .role_add(HOST_ROLE)
            .await
            .map_err(|error| self.etcd_error(error))?;
        client
            .role_grant_permission(
                HOST_ROLE,
                Permission::read_write(self.keys().prefix()).with_prefix(),
            )
            .await
            .map_err(|error| self.etcd_error(error))?;
        for host in hosts {
            self.add_host_user(host).await?;
        }
        client
            .auth_enable()
            .await
            .map_err(|error| self.etcd_error(error))?;
        Ok(())
    }

    /// Makes `host` an etcd user with the hosts' role (as `root`).
    pub async fn add_host_user(&self, host: &str) -> Result<(), StoreError> {
        let mut client = self.client();
        client
            .user_add(host, "", Some(UserAddOptions::new().with_no_pwd()))
            .await
            .map_err(|error| self.etcd_error(error))?;
        client
            .user_grant_role(host, HOST_ROLE)
            .await
            .map_err(|error| self.etcd_error(error))?;
        Ok(())
    }
}
