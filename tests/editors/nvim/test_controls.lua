-- The controls in real Neovim: partial accept (next word, next line), manual-only mode with the
-- trigger key, and the statusline component. Run:
--   nvim --headless --clean -l tests/editors/nvim/test_controls.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]
-- Like test_nvim.lua it drives a second Neovim (`--embed --headless`) over RPC, so keys go through
-- the real main loop and the plugin's mappings. We type tests/editors/growing.json (a suggestion of
-- several lines from the test model), wait until the ghost text is what `phi-lsp complete` prints,
-- and then:
--   - a keystroke that does not fit the suggestion, with the accept-word key right after it in the
--     same input, inserts nothing but the keystroke;
--   - the accept-word key inserts the next word, the accept-line key the rest of the line, then
--     the next line; each time the rest stays shown and the server serves it by typing through;
--     <Tab> then takes what is left, and the buffer is the typed text plus the whole suggestion;
--   - :PhiLsp automatic turns automatic suggestions off: typing gets none and runs no model job,
--     the trigger key asks and one appears, typing through it is still served; on again after;
--   - require('phi_lsp').statusline() in 'statusline' shows state, dtype and latency without
--     waiting for the server.

local here = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h')
local h = dofile(here .. '/harness.lua').start('test_controls.lua', {
  accept_word_key = '<M-Right>',
  accept_line_key = '<M-C-Right>',
  trigger_key = '<M-\\>',
})
local model = h.model
local mode = h.mode
local typed = h.typed
local check = h.check
local cli_suggestion = h.cli_suggestion
local expected = h.expected
local lua = h.lua
local input = h.input
local wait_for = h.wait_for
local finish = h.finish
local status = h.status
local ready = h.ready
local buffer_text = h.buffer_text
local ghost = h.ghost
local ghost_is = h.ghost_is
local next_part = h.next_part

-- What a part is, on the cases the test model's text may not show.
local parts = {
  { '    return x', 'word', '    return' },
  { '\n    return x', 'word', '\n    return' },
  { 'café = 1', 'word', 'café' },
  { '("a")', 'word', '("' },
  { '  ', 'word', '  ' },
  { 'ab\ncd', 'line', 'ab' },
  { '\ncd\nef', 'line', '\ncd' },
  { 'ab', 'line', 'ab' },
}
local wrong_parts = {}
for _, case in ipairs(parts) do
  local got = next_part(case[1], case[2])
  if got ~= case[3] then
    wrong_parts[#wrong_parts + 1] = ('next %s of %q: %q, want %q'):format(case[2], case[1], got, case[3])
  end
end
check(#wrong_parts == 0, 'the next word and the next line of a suggestion', table.concat(wrong_parts, '\n'))

lua('vim.bo.autoindent = false; vim.bo.indentexpr = ""; vim.bo.smartindent = false')
input('i' .. typed:gsub('\n', '<CR>'))
check(wait_for(5000, function()
  return buffer_text() == typed or nil
end) ~= nil, 'the keys reach the buffer', buffer_text())
local whole = wait_for(60000, ghost_is(expected))
if not check(whole ~= nil, 'the ghost text is the whole suggestion of `phi-lsp complete`',
    ('ghost:    %q\nexpected: %q'):format(ghost() or '', expected)) then
  finish()
end

-- A keystroke that does not fit, then the accept-word key in the same input (before any new
-- answer): nothing but the keystroke goes in.
local wrong = expected:sub(1, 1) == 'Z' and 'Q' or 'Z'
input(wrong .. '<M-Right>')
vim.wait(400)
check(buffer_text() == typed .. wrong, ('the accept-word key right after %q inserts nothing that no longer fits'):format(wrong),
  ('buffer: %q\nwant:   %q'):format(buffer_text(), typed .. wrong))
-- Back: the whole suggestion comes again (asked for by the client), and nothing fails meanwhile
-- (0.12 would draw the item answered for the "Z" place, now beyond the end of the line: an error).
lua([[vim.v.errmsg = '']])
input('<BS>')
check(wait_for(60000, ghost_is(expected)) ~= nil, 'after <BS> the whole suggestion is shown again',
  ('ghost:    %q\nexpected: %q'):format(ghost() or '', expected))
local errmsg = lua([[return vim.v.errmsg]])
check(errmsg == '', 'no error on the way', errmsg)

-- Word, line, line, then <Tab>: each part goes in, the rest stays shown and is typed through.
local done, rest = '', expected
local function accept(key, part)
  local piece = next_part(rest, part)
  local last_before = status().last
  input(key)
  local want = typed .. done .. piece
  local inserted = wait_for(5000, function()
    return buffer_text() == want or nil
  end)
  check(inserted ~= nil, ('%s inserts the next %s %q'):format(key, part, piece),
    ('buffer: %q\nwant:   %q'):format(buffer_text(), want))
  done, rest = done .. piece, rest:sub(#piece + 1)
  local cursor = lua('return vim.api.nvim_win_get_cursor(0)')
  local want_lines = vim.split(want, '\n')
  check(cursor[1] == #want_lines and cursor[2] == #want_lines[#want_lines], 'the cursor ends after it',
    vim.inspect({ cursor, #want_lines, #want_lines[#want_lines] }))
  check(wait_for(3000, ghost_is(rest)) ~= nil, 'the rest of the suggestion stays shown',
    ('ghost: %q\nrest:  %q'):format(ghost() or '', rest))
  -- The client asks again after the edit; the server answers from the suggestion shown.
  local served = wait_for(5000, function()
    local s = status()
    return s.last and s.last.stop == 'typed-through' and not vim.deep_equal(s.last, last_before) and s.last or nil
  end)
  check(served ~= nil, 'the server serves the rest by typing through', vim.inspect(status().last))
  check(wait_for(3000, ghost_is(rest)) ~= nil, 'and the ghost text is still that rest',
    ('ghost: %q\nrest:  %q'):format(ghost() or '', rest))
end
accept('<M-Right>', 'word')
accept('<M-C-Right>', 'line')
if rest:sub(1, 1) == '\n' then
  accept('<M-C-Right>', 'line')
end
input('<Tab>')
local all = typed .. expected
check(wait_for(5000, function()
  return buffer_text() == all or nil
end) ~= nil, '<Tab> then accepts what is left: the buffer is the typed text plus the whole suggestion',
  ('buffer: %q\nwant:   %q'):format(buffer_text(), all))

-- Manual-only mode.
input('<Esc>')
local said = lua([[
  local messages = {}
  local notify = vim.notify
  vim.notify = function(msg) messages[#messages + 1] = msg end
  vim.cmd('PhiLsp automatic')
  vim.notify = notify
  return table.concat(messages, '\n')
]])
check(said:find('automatic suggestions off', 1, true) ~= nil and said:find('<M-\\>', 1, true) ~= nil,
  ':PhiLsp automatic turns them off and names the trigger key', said)
local manual = wait_for(10000, function()
  local s = status()
  return s.automatic == false and s or nil
end)
check(manual ~= nil, 'the server is told (phi-lsp/status: automatic false)', vim.inspect(status()))
local line = lua([[return require('phi_lsp').statusline()]])
check(wait_for(5000, function()
  local text = lua([[return vim.api.nvim_eval_statusline(vim.o.statusline, {}).str]])
  return text:find('manual', 1, true) and text or nil
end) ~= nil, 'the statusline says manual', line)

local described = lua([[
  local messages = {}
  local notify = vim.notify
  vim.notify = function(msg) messages[#messages + 1] = msg end
  vim.cmd('PhiLsp status')
  vim.notify = notify
  return table.concat(messages, '\n')
]])
check(described:find('manual-only: <M-\\> asks', 1, true) ~= nil, ':PhiLsp status says manual-only and names the key',
  described)

-- A fresh place: a new function head, typed; no suggestion and no model job.
local head = '\n\ndef fib(n):\n    """Return the n-th Fibonacci number."""\n    '
local jobs = status().worker.jobsRun
input('Go' .. head:sub(2):gsub('\n', '<CR>'))
local text2 = all .. head
check(wait_for(5000, function()
  return buffer_text() == text2 or nil
end) ~= nil, 'the keys reach the buffer', ('buffer: %q\nwant:   %q'):format(buffer_text(), text2))
local asked = wait_for(5000, function()
  local s = status()
  return s.last and s.last.stop == 'manual' and s or nil
end)
check(asked ~= nil, 'typing asks (automatically) and the server answers "manual"', vim.inspect(status().last))
vim.wait(700)
check(ghost() == nil, 'no ghost text appears while typing', ghost())
check(status().worker.jobsRun == jobs, 'no model job ran', ('%s then %s'):format(jobs, status().worker.jobsRun))

input('<M-\\>')
local shown = wait_for(60000, ghost)
check(shown ~= nil, 'the trigger key <M-\\> asks, and a suggestion appears')
check(status().worker.jobsRun > jobs, 'the model ran for it', vim.inspect(status().worker))
if shown then
  local fresh = cli_suggestion(text2)
  wait_for(10000, ghost_is(fresh))
  check(ghost() == fresh, 'it is what `phi-lsp complete` suggests there',
    ('ghost:    %q\nexpected: %q'):format(ghost() or '', fresh or ''))
  -- Typing its first character: the client asks by itself, answered from the cache.
  local first = shown:sub(1, 1)
  local wanted_rest = (ghost() or shown):sub(2)
  input(first == ' ' and '<Space>' or first)
  check(wait_for(5000, function()
    local s = status()
    return s.last and s.last.stop == 'typed-through' or nil
  end) ~= nil, 'typing through it is served in manual-only mode', vim.inspect(status().last))
  check(wait_for(3000, ghost_is(wanted_rest)) ~= nil, 'and the rest stays shown',
    ('ghost: %q\nrest:  %q'):format(ghost() or '', wanted_rest))
end
input('<Esc>')
lua([[vim.notify = function() end; vim.cmd('PhiLsp automatic')]])
check(wait_for(10000, function()
  return status().automatic == true or nil
end) ~= nil, ':PhiLsp automatic turns them back on', vim.inspect(status()))

-- The statusline component: a cached string, refreshed from phi-lsp/status without waiting.
local dtype = status().dtype
local rendered = wait_for(5000, function()
  local text = lua([[return vim.api.nvim_eval_statusline(vim.o.statusline, {}).str]])
  return text:match('^phi ready ' .. vim.pesc(dtype) .. ' %S+ms$') and text or nil
end)
check(rendered ~= nil, ('the statusline shows "phi ready %s <latency>ms"'):format(dtype),
  lua([[return vim.api.nvim_eval_statusline(vim.o.statusline, {}).str]]))
local cost = lua([[
  local phi = require('phi_lsp')
  phi._statusline.at = nil -- due: the call sends a request
  local started = vim.uv.hrtime()
  local text = phi.statusline()
  local ms = (vim.uv.hrtime() - started) / 1e6
  return { ms = ms, pending = phi._statusline.pending, text = text }
]])
check(cost.ms < 20 and cost.text ~= '', 'statusline() returns at once while its request is in flight',
  vim.inspect(cost))
lua([[require('phi_lsp').set_enabled(false)]])
check(lua([[return require('phi_lsp').statusline()]]) == 'phi off', 'with suggestions off it says "phi off"')
lua([[require('phi_lsp').set_enabled(true)]])

finish()
