--- Ghost text for Neovim 0.10-0.11, which have no `vim.lsp.inline_completion`: asks the server's
--- textDocument/inlineCompletion after a pause in typing and shows the first item as extmarks
--- (the first line inline at the cursor, the rest as virtual lines), redrawn as the server's
--- suggestion grows (grow()). It is cleared when the cursor moves away and on leaving insert mode;
--- accept() puts it in the buffer.
local M = {}

local api = vim.api
local ns = api.nvim_create_namespace('phi_lsp.ghost')
M.namespace = ns

--- Per buffer: client_id, timer, pending (request id), shown ({row, col, text, range}).
---@type table<integer, table>
local buffers = {}

local function set_highlight()
  api.nvim_set_hl(0, 'PhiLspGhostText', { link = 'Comment', default = true })
  api.nvim_set_hl(0, 'PhiLspGhostTextMore', { link = 'Comment', default = true })
end

local function stop_timer(state)
  local timer = state.timer
  state.timer = nil
  if timer and not timer:is_closing() then
    timer:stop()
    timer:close()
  end
end

local function cancel_pending(state)
  local id = state.pending
  state.pending = nil
  local client = id and vim.lsp.get_client_by_id(state.client_id)
  if client then
    require('phi_lsp')._call(client, 'cancel_request', id)
  end
end

--- Removes the ghost text of a buffer.
function M.clear(bufnr)
  local state = buffers[bufnr]
  if state then
    state.shown = nil
  end
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
end

function M.clear_all()
  for bufnr, state in pairs(buffers) do
    stop_timer(state)
    cancel_pending(state)
    M.clear(bufnr)
  end
end

--- Byte column of an LSP character offset on a line.
local function byte_col(line, character, encoding)
  if encoding == 'utf-8' then
    return math.min(character, #line)
  end
  local ok, col
  if vim.fn.has('nvim-0.11') == 1 then
    ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  else
    ok, col = pcall(vim.str_byteindex, line, character, encoding == 'utf-16')
  end
  return ok and col or #line
end

local function to_pos(bufnr, position, encoding)
  local line = api.nvim_buf_get_lines(bufnr, position.line, position.line + 1, false)[1] or ''
  return position.line, byte_col(line, position.character, encoding)
end

local function cursor_of(win)
  local cursor = api.nvim_win_get_cursor(win)
  return cursor[1] - 1, cursor[2]
end

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == 'i'
end

--- Shows `text`, to be inserted over `range` (0-based rows, byte columns), at the cursor. With
--- `items` (the texts of the server's answer, `text` the `index`th), cycle() can move to the others;
--- with `hint`, "(index/n)" follows the text (as 0.12's native ghost text shows it once cycled).
local function show(bufnr, row, col, text, range, items, index, hint)
  M.clear(bufnr)
  -- The part of the suggestion already typed between the range start and the cursor is not shown
  -- again; a suggestion that disagrees with it is not shown at all.
  local typed = ''
  if range.start_row == row and range.start_col < col then
    typed = api.nvim_buf_get_text(bufnr, row, range.start_col, row, col, {})[1] or ''
  elseif range.start_row ~= row or range.start_col > col then
    return
  end
  if text:sub(1, #typed) ~= typed then
    return
  end
  local rest = text:sub(#typed + 1)
  if rest == '' then
    return
  end
  local lines = vim.split(rest, '\n', { plain = true })
  local chunks = {}
  for i, line in ipairs(lines) do
    chunks[i] = line ~= '' and { { line, 'PhiLspGhostText' } } or {}
  end
  if hint and items and #items > 1 and index then
    table.insert(chunks[#chunks], { (' (%d/%d)'):format(index, #items), 'PhiLspGhostTextMore' })
  end
  local virt_lines = {}
  for i = 2, #chunks do
    virt_lines[#virt_lines + 1] = chunks[i]
  end
  api.nvim_buf_set_extmark(bufnr, ns, row, col, {
    virt_text = #chunks[1] > 0 and chunks[1] or nil,
    virt_text_pos = 'inline',
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = 'combine',
  })
  buffers[bufnr].shown = {
    row = row,
    col = col,
    text = text,
    range = range,
    tick = api.nvim_buf_get_changedtick(bufnr),
    items = items,
    index = index,
  }
end

--- The plain-text insertText of an inline completion item, or nil.
local function item_text(item)
  local text = type(item) == 'table' and item.insertText
  if type(text) == 'table' then
    if text.kind == 'snippet' then
      return nil -- snippets need the native implementation (0.12+)
    end
    text = text.value
  end
  return type(text) == 'string' and text ~= '' and text or nil
end

--- Asks the server for a suggestion at the cursor and shows it if nothing changed meanwhile;
--- `kind` is the LSP triggerKind (default 2, Automatic; 1, Invoked, is the user asking). With
--- `delta`, the answer's item that far from the first is shown (cycle()).
function M.request(bufnr, kind, delta)
  local state = buffers[bufnr]
  local win = api.nvim_get_current_win()
  if not state or api.nvim_win_get_buf(win) ~= bufnr or not in_insert_mode() then
    return
  end
  if not require('phi_lsp').enabled then
    return
  end
  local client = vim.lsp.get_client_by_id(state.client_id)
  if not client then
    return
  end
  cancel_pending(state)
  local encoding = client.offset_encoding or 'utf-16'
  local params = vim.lsp.util.make_position_params(win, encoding)
  params.context = { triggerKind = kind or 2 }
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local row, col = cursor_of(win)
  -- Declared before the call: a local is not in scope in its own initializer, so the callback
  -- would otherwise compare with the global `id` and never clear `pending`.
  local ok, id
  ok, id = require('phi_lsp')._call(client, 'request', 'textDocument/inlineCompletion', params, function(err, result)
    if state.pending == id then
      state.pending = nil
    end
    if err or type(result) ~= 'table' then
      return
    end
    if
      not api.nvim_buf_is_valid(bufnr)
      or api.nvim_buf_get_changedtick(bufnr) ~= tick
      or api.nvim_get_current_buf() ~= bufnr
      or not in_insert_mode()
    then
      return
    end
    local now_row, now_col = cursor_of(api.nvim_get_current_win())
    if now_row ~= row or now_col ~= col then
      return
    end
    local item = (result.items or result)[1]
    if type(item) ~= 'table' then
      M.clear(bufnr)
      return
    end
    if type(item.insertText) == 'table' and item.insertText.kind == 'snippet' then
      return
    end
    local text = item_text(item)
    if not text then
      M.clear(bufnr)
      return
    end
    -- The alternatives (an explicit request's): the items with the first one's range.
    local items = { text }
    for i, other in ipairs(result.items or result) do
      local other_text = i > 1 and item_text(other)
      if other_text and vim.deep_equal(other.range, item.range) then
        items[#items + 1] = other_text
      end
    end
    local index = (((delta or 0) % #items) + 1)
    local range = { start_row = row, start_col = col, end_row = row, end_col = col }
    if item.range then
      range.start_row, range.start_col = to_pos(bufnr, item.range.start, encoding)
      range.end_row, range.end_col = to_pos(bufnr, item.range['end'], encoding)
    end
    show(bufnr, row, col, items[index], range, items, index, index ~= 1)
  end, bufnr)
  if ok then
    state.pending = id
  end
end

--- Shows a grown suggestion (`phi-lsp/suggestionGrew`) at the cursor, in place of the ghost text
--- there; the caller checked that the buffer and the cursor are still where it was asked for.
function M.grow(bufnr, row, col, text)
  if not buffers[bufnr] or text == '' then
    return
  end
  show(bufnr, row, col, text, { start_row = row, start_col = col, end_row = row, end_col = col })
end

--- Debounced request after typing or moving in insert mode; ghost text that no longer sits at the
--- cursor goes at once.
local function on_change(bufnr)
  local state = buffers[bufnr]
  if not state then
    return
  end
  local shown = state.shown
  if shown then
    local row, col = cursor_of(api.nvim_get_current_win())
    if row ~= shown.row or col ~= shown.col or api.nvim_buf_get_changedtick(bufnr) ~= shown.tick then
      M.clear(bufnr)
    end
  end
  stop_timer(state)
  cancel_pending(state)
  if not require('phi_lsp').enabled then
    return
  end
  local delay = require('phi_lsp').config.debounce_ms or 150
  state.timer = vim.defer_fn(function()
    state.timer = nil
    M.request(bufnr)
  end, delay)
end

function M.attach(bufnr, client_id)
  set_highlight()
  if buffers[bufnr] then
    buffers[bufnr].client_id = client_id
    return
  end
  buffers[bufnr] = { client_id = client_id }
  local group = api.nvim_create_augroup('phi_lsp.ghost.' .. bufnr, { clear = true })
  api.nvim_create_autocmd({ 'InsertEnter', 'TextChangedI', 'CursorMovedI' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      on_change(bufnr)
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      local state = buffers[bufnr]
      if state then
        stop_timer(state)
        cancel_pending(state)
      end
      M.clear(bufnr)
    end,
  })
  api.nvim_create_autocmd('LspDetach', {
    group = group,
    buffer = bufnr,
    callback = function(args)
      if args.data.client_id == client_id then
        M.detach(bufnr)
      end
    end,
  })
  api.nvim_create_autocmd('ColorScheme', { group = group, callback = set_highlight })
end

function M.detach(bufnr)
  local state = buffers[bufnr]
  if not state then
    return
  end
  stop_timer(state)
  cancel_pending(state)
  M.clear(bufnr)
  buffers[bufnr] = nil
  pcall(api.nvim_del_augroup_by_name, 'phi_lsp.ghost.' .. bufnr)
end

--- The ghost text shown in a buffer: { row, col, text } or nil.
function M.current(bufnr)
  local state = buffers[bufnr or api.nvim_get_current_buf()]
  return state and state.shown
end

--- Asks now, as the user's explicit request (triggerKind Invoked), without the debounce.
function M.trigger(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local state = buffers[bufnr]
  if not state then
    return false
  end
  stop_timer(state)
  M.request(bufnr, 1)
  return true
end

--- Shows the next (`delta` 1) or previous (-1) of the suggestions the server answered with,
--- wrapping around; over one that came alone, or none, asks explicitly (its alternatives) and
--- shows the one `delta` from the first.
function M.cycle(bufnr, delta)
  bufnr = bufnr or api.nvim_get_current_buf()
  local state = buffers[bufnr]
  if not state then
    return false
  end
  local shown = state.shown
  local row, col = cursor_of(api.nvim_get_current_win())
  if
    shown
    and shown.items
    and #shown.items > 1
    and shown.row == row
    and shown.col == col
    and shown.tick == api.nvim_buf_get_changedtick(bufnr)
  then
    local index = (shown.index - 1 + delta) % #shown.items + 1
    show(bufnr, row, col, shown.items[index], shown.range, shown.items, index, true)
    return true
  end
  stop_timer(state)
  M.request(bufnr, 1, shown and delta or 0)
  return true
end

--- Where the shown suggestion goes now: { row, col (the cursor's), rest (the part of the text
--- after the cursor) } when it still fits the text at the cursor, nil when it does not: the cursor
--- is on the row of its (one-line) range, at or after its start, and what lies between the start
--- and the cursor begins the suggestion.
local function fit(bufnr, shown)
  local win = vim.fn.bufwinid(bufnr)
  if win == -1 then
    return nil
  end
  local row, col = cursor_of(win)
  local range = shown.range
  if range.start_row ~= row or range.end_row ~= row or range.start_col > col then
    return nil
  end
  local typed = api.nvim_buf_get_text(bufnr, row, range.start_col, row, col, {})[1] or ''
  if shown.text:sub(1, #typed) ~= typed then
    return nil
  end
  return { row = row, col = col, rest = shown.text:sub(#typed + 1) }
end

--- Puts the shown suggestion in the buffer (scheduled, so that it works from an <expr> mapping)
--- and moves the cursor after it; with `part` ('word' or 'line') only its next word or line, the
--- rest staying shown at the new cursor (and then served by typing through it). Nothing goes in
--- where the suggestion no longer fits the text at the cursor (typed meanwhile): it is dropped and
--- asked for again. False when nothing is shown.
---@param part? 'word'|'line'
function M.accept(bufnr, part)
  bufnr = bufnr or api.nvim_get_current_buf()
  local state = buffers[bufnr]
  local shown = state and state.shown
  if not shown then
    return false
  end
  vim.schedule(function()
    if state.shown ~= shown or not api.nvim_buf_is_valid(bufnr) then
      return
    end
    local place = fit(bufnr, shown)
    M.clear(bufnr)
    if not place then
      M.request(bufnr)
      return
    end
    local phi = require('phi_lsp')
    local piece = part and phi.next_part(place.rest, part) or place.rest
    if piece ~= place.rest then
      local row, col = phi._insert_at(bufnr, place.row, place.col, piece)
      local left = place.rest:sub(#piece + 1)
      show(bufnr, row, col, left, { start_row = row, start_col = col, end_row = row, end_col = col })
      return
    end
    local range = shown.range
    local lines = vim.split(shown.text, '\n', { plain = true })
    local end_col = math.max(range.end_col, place.col)
    api.nvim_buf_set_text(bufnr, range.start_row, range.start_col, range.end_row, end_col, lines)
    local last_row = range.start_row + #lines - 1
    local last_col = (#lines == 1 and range.start_col or 0) + #lines[#lines]
    local win = vim.fn.bufwinid(bufnr)
    if win ~= -1 then
      api.nvim_win_set_cursor(win, { last_row + 1, last_col })
    end
  end)
  return true
end

return M
