//! Joining and leaving rooms, and the list of rooms.

use std::net::IpAddr;

use hubbub_protocol::reply::{
    JoinOk, LeaveOk, MemberInfo, MemberList, RemoveOk, RoomInfo, RoomPage,
};
use hubbub_protocol::{is_valid_room_name, Conv, ErrorCode, ProtoError};

use super::{Actor, Node};

/// Largest page of [`Node::rooms`].
pub const ROOMS_PAGE_MAX: usize = 500;

fn room_conv(name: &str) -> Result<String, ProtoError> {
    if !is_valid_room_name(name) {
        return Err(ProtoError::bad_request(
            "room must match ^[A-Za-z0-9_.-]{1,64}$",
        ));
    }
    Ok(Conv::room_id(name))
}

impl Node {
    /// Joins the room `name`, creating it on first join (its creator is its admin). A
    /// user may be in at most `max_rooms_per_user` rooms; creating a room takes a token
    /// from the room-creation buckets of `peer` and of the server. Answered once the
    /// room's member list has the join, so the joiner gets every message after
    /// `last_seq`.
    pub async fn join(
        &self,
        actor: Actor<'_>,
        name: &str,
        peer: IpAddr,
    ) -> Result<JoinOk, ProtoError> {
        let conv = room_conv(name)?;
        let room = self.room(&conv).await?;
        if !room.contains(actor.user) {
            let max = self.limits.max_rooms_per_user;
            let rooms = self
                .store
                .memberships(actor.user)
                .await?
                .iter()
                .filter(|c| c.conv.starts_with("room:"))
                .count();
            if rooms >= max {
                return Err(ProtoError::new(
                    ErrorCode::Forbidden,
                    format!("a user may be a member of at most {max} rooms"),
                ));
            }
        }
        // A room nobody is in may be created by this join: that takes a token from the
        // address's and the server's room-creation buckets first.
        if room.is_empty() {
            self.room_creation.check(peer)?;
        }
        let outcome = self.store.join_room(&conv, actor.user).await?;
        // The room's bus shard applies the join (and tells the members) in commit order
        // with the room's messages; answer once it has.
        self.bus.flush(&conv).await;
        let room = self.room(&conv).await?;
        Ok(JoinOk {
            online: self.online_in(&room),
            conv,
            last_seq: outcome.last_seq,
            created: outcome.created,
        })
    }

    /// Leaves the room `name` (`not_member` if the user is not in it). The answer's
    /// `last_seq` is the room's last seq when the leave committed: the leaver was pushed
    /// every message up to it and none after.
    pub async fn leave(&self, actor: Actor<'_>, name: &str) -> Result<LeaveOk, ProtoError> {
        let conv = room_conv(name)?;
        let Some(last_seq) = self.store.leave_room(&conv, actor.user, None).await? else {
            return Err(ProtoError::new(
                ErrorCode::NotMember,
                format!("you are not a member of {conv}"),
            ));
        };
        // As for a join: answered once the room's shard has applied it.
        self.bus.flush(&conv).await;
        Ok(LeaveOk { conv, last_seq })
    }

    /// Removes `user` from the room `name`: only a room admin, or a server admin
    /// (`server_admin`), may. The removed user stops being a member exactly as after a
    /// leave; the members, the removed user's sessions included, get `member` with
    /// `event: removed` and `by`.
    pub async fn remove(
        &self,
        actor: Actor<'_>,
        server_admin: bool,
        name: &str,
        user: &str,
    ) -> Result<RemoveOk, ProtoError> {
        let conv = room_conv(name)?;
        let role = self.store.member_role(&conv, actor.user).await?;
        if role.as_deref() != Some("admin") && !server_admin {
            return Err(ProtoError::new(
                ErrorCode::Forbidden,
                "only a room admin may remove a member",
            ));
        }
        if self
            .store
            .leave_room(&conv, user, Some(actor.user))
            .await?
            .is_none()
        {
            return Err(ProtoError::new(
                ErrorCode::NotMember,
                format!("{user} is not a member of {conv}"),
            ));
        }
        self.bus.flush(&conv).await;
        Ok(RemoveOk {
            conv,
            user: user.to_string(),
        })
    }

    /// The members of the room `name` with their roles, whether they are online and
    /// when they joined: for its members only (`not_member` for others).
    pub async fn room_members(&self, caller: &str, name: &str) -> Result<MemberList, ProtoError> {
        let conv = room_conv(name)?;
        let members = self.store.room_members(&conv).await?;
        if !members.iter().any(|m| m.user == caller) {
            return Err(ProtoError::new(
                ErrorCode::NotMember,
                format!("you are not a member of {conv}"),
            ));
        }
        Ok(MemberList {
            members: members
                .into_iter()
                .map(|m| MemberInfo {
                    online: self.presence.is_online(&m.user),
                    user: m.user,
                    role: m.role,
                    joined_at: m.joined_at,
                })
                .collect(),
        })
    }

    /// Rooms with their member and online counts, in name order: at most `limit`
    /// (1 to [`ROOMS_PAGE_MAX`]), those after the room `after` when given.
    pub async fn rooms(&self, after: Option<&str>, limit: usize) -> Result<RoomPage, ProtoError> {
        if limit == 0 || limit > ROOMS_PAGE_MAX {
            return Err(ProtoError::bad_request(format!(
                "limit must be 1..={ROOMS_PAGE_MAX}"
            )));
        }
        let after = after.map(Conv::room_id);
        // One more than the page tells whether another page follows.
        let mut rooms = self.store.rooms(after.as_deref(), limit + 1).await?;
        let more = rooms.len() > limit;
        rooms.truncate(limit);
        let mut out = Vec::with_capacity(rooms.len());
        for r in rooms {
            let online = match self.members.room(&r.conv).await {
                Ok(room) => self.online_in(&room),
                Err(_) => 0,
            };
            let name = r.conv.strip_prefix("room:").unwrap_or(&r.conv).to_string();
            out.push(RoomInfo {
                name,
                conv: r.conv,
                members: r.members,
                online,
            });
        }
        let next = if more {
            out.last().map(|r| r.name.clone())
        } else {
            None
        };
        Ok(RoomPage { rooms: out, next })
    }
}
