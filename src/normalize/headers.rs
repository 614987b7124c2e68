//! The AMI header names the normalizer reads, in one place.
//!
//! [`Frame::get`](crate::ami::Frame::get) compares names ASCII
//! case-insensitively; these are spelled the way Asterisk writes them.
//! Channel variable names (`QUEUESTATUS`, `MIXMONITOR_FILENAME`…) are
//! values of [`VARIABLE`], not headers: they live next to the code that
//! reads them.

// Identity of channels and calls.
pub const UNIQUEID: &str = "Uniqueid";
pub const LINKEDID: &str = "Linkedid";
pub const CHANNEL: &str = "Channel";
pub const CHANNEL_STATE_DESC: &str = "ChannelStateDesc";
pub const DEST_UNIQUEID: &str = "DestUniqueid";
pub const DEST_LINKEDID: &str = "DestLinkedid";
pub const DEST_CHANNEL: &str = "DestChannel";
pub const DEST_CHANNEL_STATE_DESC: &str = "DestChannelStateDesc";
pub const BRIDGE_ID: &str = "BridgeId";

// Caller and dialplan.
pub const CALLER_ID_NUM: &str = "CallerIDNum";
pub const CALLER_ID_NAME: &str = "CallerIDName";
pub const EXTEN: &str = "Exten";
pub const APPLICATION: &str = "Application";
/// `Newexten`'s arguments of the application.
pub const APP_DATA: &str = "AppData";
/// `CoreShowChannel`'s arguments of the application.
pub const APPLICATION_DATA: &str = "ApplicationData";
/// `CoreShowChannel`: how long the channel exists (`HH:MM:SS`).
pub const DURATION: &str = "Duration";

// Channel variables (`VarSet`).
pub const VARIABLE: &str = "Variable";
pub const VALUE: &str = "Value";

// Queues and their members.
pub const QUEUE: &str = "Queue";
pub const POSITION: &str = "Position";
pub const INTERFACE: &str = "Interface";
pub const STATE_INTERFACE: &str = "StateInterface";
pub const MEMBER_NAME: &str = "MemberName";
/// Older spelling of [`INTERFACE`] (`QueueMember` list items).
pub const LOCATION: &str = "Location";
/// Older spelling of [`MEMBER_NAME`] (`QueueMember` list items).
pub const NAME: &str = "Name";
pub const PAUSED: &str = "Paused";
pub const PAUSED_REASON: &str = "PausedReason";
/// Older spelling of [`PAUSED_REASON`].
pub const REASON: &str = "Reason";
/// A member's device state (`enum ast_device_state`, a number).
pub const STATUS: &str = "Status";

// Dialling and hangup.
pub const DIAL_STATUS: &str = "DialStatus";
pub const DIAL_STRING: &str = "DialString";
pub const CAUSE: &str = "Cause";
pub const CAUSE_TXT: &str = "Cause-txt";

// Transfers.
pub const RESULT: &str = "Result";
pub const TRANSFEREE_LINKEDID: &str = "TransfereeLinkedid";
pub const ORIG_TRANSFERER_LINKEDID: &str = "OrigTransfererLinkedid";
pub const TRANSFERER_LINKEDID: &str = "TransfererLinkedid";
pub const TRANSFERER_CHANNEL: &str = "TransfererChannel";
pub const ORIG_TRANSFERER_CHANNEL: &str = "OrigTransfererChannel";
pub const TRANSFER_TARGET_CHANNEL: &str = "TransferTargetChannel";
pub const SECOND_TRANSFERER_CONNECTED_LINE_NUM: &str = "SecondTransfererConnectedLineNum";
/// `BlindTransfer`: the extension the call was sent to.
pub const EXTENSION: &str = "Extension";

// Action responses (`OriginateResponse`).
pub const RESPONSE: &str = "Response";
